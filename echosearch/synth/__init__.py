"""Synthetic longitudinal echocardiography cohort with ground truth (``echosearch synth``).

No real longitudinal echo archive ships with the project, so this package writes one: patients with
persistent, slowly drifting anatomy, several visits over years, EF changes, device implants and
transplants, rendered as ultrasound cine loops (fan sector, speckle, shadow and reverberation behind
metal, burned-in text, scale and ECG) and exported as DICOM (several vendors' transfer syntaxes and
photometrics) and/or EchoNet-style AVI, with report text and a ground-truth table. The generator knows
nothing of any model.
"""

from echosearch.synth.cohort import generate, generate_cohort, plan_cohort, video_jobs
from echosearch.synth.config import EVENTS, PROFILES, VIEWS, Profile, SynthConfig, es_area_ratio
from echosearch.synth.render import Acquisition, Rendered, Sector, render_video

__all__ = [
    "EVENTS", "PROFILES", "VIEWS", "Acquisition", "Profile", "Rendered", "Sector", "SynthConfig",
    "es_area_ratio", "generate", "generate_cohort", "plan_cohort", "render_video", "video_jobs",
]
