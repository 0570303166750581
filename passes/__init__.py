"""g4c.passes — IR-to-IR rewrites (fusions, KV-cache planning), each proven with the reference interpreter."""
