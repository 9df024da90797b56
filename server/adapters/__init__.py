"""Outside systems behind small interfaces, each with a local default: LLM, payments, blobs, zkLogin, embedded
PostgreSQL."""
