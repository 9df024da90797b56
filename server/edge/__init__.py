"""The kit handlers are built from: namespace base and @command, REST helpers and middlewares, schemas, health."""
