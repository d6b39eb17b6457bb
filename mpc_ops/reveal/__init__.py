"""The blinded reveal: request types, frame, client, policy, ledger, flooding and DP."""
