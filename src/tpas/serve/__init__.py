"""Search server: FastAPI JSON API + a static web page (see ``create_app``)."""

from tpas.serve.app import Limits, create_app

__all__ = ["Limits", "create_app"]
