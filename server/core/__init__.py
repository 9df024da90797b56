"""Settings, errors, json, money, crypto, wallets, identity, logging, metrics: imports nothing else of the project."""
