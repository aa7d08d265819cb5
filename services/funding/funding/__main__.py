"""`python -m funding`: serve the funding service (consumer of funding.order-paid, /healthz, /metrics)."""

from esim_common.service import run
from esim_common.settings import load_settings
from funding.main import DEFAULT_PORT, create_app

if __name__ == "__main__":
    settings = load_settings()
    run(create_app(settings), settings, default_port=DEFAULT_PORT)
