"""The app's side of echosearch (the Streamlit pages in ``app/`` are thin over it).

* :mod:`~echosearch.appcore.launch`: ``echosearch serve`` (the index's server, then the app as its client).
* :mod:`~echosearch.appcore.auth`: loopback trust, password / OIDC login, sign-in throttle, the actor.
* :mod:`~echosearch.appcore.data`: :class:`AppIndex`, what the pages read and write, local or through the
  server (:mod:`~echosearch.appcore.remote`); :mod:`~echosearch.appcore.views` computes the page data.
* :mod:`~echosearch.appcore.search`: the search form's request, filters and outcome on the wire.

See docs/app.md.
"""
