"""Domain rules, one module per domain word: they own transactions, events and channel names."""
