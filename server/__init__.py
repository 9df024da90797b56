"""The SourceNet Hub server: the composition root (app, cli, checks) and its layers (docs/architecture.md)."""
