"""Token-level stages: generate and score responses into token tables, gather, analyse."""
