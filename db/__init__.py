"""The database: the pool, the migration runner and one module of named queries per domain."""
