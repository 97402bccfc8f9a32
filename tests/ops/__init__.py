"""Tests of the public ops, one module per op family (``test_<family>.py``)."""
