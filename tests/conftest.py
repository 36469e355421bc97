"""Suite-wide options: ``--runslow`` runs the long soak/torture tests too."""


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run long soak/torture tests (minutes to an hour)")
