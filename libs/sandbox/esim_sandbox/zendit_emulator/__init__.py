"""A stateful, in-memory emulator of the Zendit API v1 plus our top-up gateway contract.

`create_app(...)` builds it; `python -m esim_sandbox.zendit_emulator --port 12112 --stripe-url ...`
serves it. Routes and controls: see `api.py`, `topup.py` and `control.py`.
"""

from .app import create_app
from .state import Fault, PurchaseRule, ZenditState

__all__ = ["Fault", "PurchaseRule", "ZenditState", "create_app"]
