"""The funding service. A placeholder until the next issue puts the service on top of libs/common."""
