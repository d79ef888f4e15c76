"""The explorer's own code, between the pages and ``eapcore``: Streamlit caches, session state and the
current circuit (``cache``, ``state``, ``current``), shared widgets, words for provenance, the pictures
(``layout``, ``graph_html``, ``figures``: no Streamlit), downloads and uploads (``exports``), and the app
as a subprocess for browser-driven scripts and tests (``server``). Only ``app.py``, ``pages/`` and this
package import streamlit; ``eapcore`` never does."""
