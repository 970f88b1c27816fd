"""Ingest: find files, decode, choose frames, prepare model input, pseudonymise, previews."""
