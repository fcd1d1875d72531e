"""Integrations of altub_fast into other frameworks, each an optional extra.

- :mod:`altub_fast.integrations.anomalib`: ``AltUBFastflow`` and ``AltUBCflow``, anomalib models that
  anomalib's ``Engine`` trains, tests and exports (``pip install "altub_fast[anomalib]"``).

Nothing here is imported by ``import altub_fast``; importing an integration without its framework
raises one ImportError that names the extra to install.
"""
