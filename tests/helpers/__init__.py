"""Code the test modules share that is not itself a test (pytest collects nothing here): tiny
networks, the hand-made batches and method builders of a method's tests, trainer test doubles.

Fixtures live in tests/conftest.py; running train.py and the scripts in-process is tests/_helpers.py;
the golden comparisons are tests/_golden.py and tests/_golden_seeded.py. A test module imports from
these, never from another test module."""
