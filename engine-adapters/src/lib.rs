//! What engines link (a later issue): the reference CPU engine and its
//! prefill/decode workers, connectors for vLLM / SGLang / LMCache, and the
//! weight loader. Empty for now.
