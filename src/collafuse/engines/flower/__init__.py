"""Flower engine: thin ServerApp / ClientApp adapters over collafuse Client and Server.

- ``transport``: pack/unpack lists of encoded CollaFuse messages into Flower RecordDicts.
- ``server_app``: the ServerApp (``collafuse.engines.flower.server_app:app``).
- ``client_app``: the ClientApp (``collafuse.engines.flower.client_app:app``).
"""
