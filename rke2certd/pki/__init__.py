"""X.509 and key work, following RKE2's profiles (RKE2-PKI.md §1-§3)."""
