"""X.509 and key work, following RKE2's profiles (docs/RKE2-COMPATIBILITY.md §2-§4)."""
