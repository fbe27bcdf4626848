"""`make bench`: orderflow measured beside its floors, its ceiling and a Celery peer, on real
processes on loopback. `python -m bench --quick` is the smoke run; see bench/run.py."""
