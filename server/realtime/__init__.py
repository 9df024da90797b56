"""The delivery engine: Engine.IO engine, fan-out, channel hub, history, presence, Redis, rate limits, outbox relay."""
