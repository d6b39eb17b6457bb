"""`hetrain bench --leakage`: the trainer as an attacker, against the key holder (in-process and over HTTP).

Every privacy claim is a number from here: each deviating attack gets a verdict (`blocked` or `leaked`) and a
measure, scored against the truth that only this harness (never the trainer) reads.
"""
