"""Explicit public-side CKKS calls, parameters, SEAL/TenSEAL wire parsing and isolation."""
