//! vLLM simulator (being written).
