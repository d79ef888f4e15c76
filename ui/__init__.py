"""Streamlit-aware helpers for the explorer (the only place besides ``app.py`` and ``pages/`` that
imports streamlit): caching of models, data, evaluators and results; session state; widgets."""
