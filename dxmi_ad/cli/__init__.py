"""The ``dxmi-ad`` command line (Typer): one module per command group, see :mod:`dxmi_ad.cli.main`."""
