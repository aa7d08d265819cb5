"""The provisioning service: buys funded orders' eSIMs from Zendit and stores their QR codes."""
