"""Governance: principals, tokens, the policy engine, the audit chain and masking."""
