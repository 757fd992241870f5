"""Packaging, the part pyproject.toml (metadata, dependencies, the build backend) leaves here:
the three programs live in top-level folders but install as pvpn.client, pvpn.server and
pvpn.gateway, so every import is an absolute ``pvpn.…`` one; the supervisord sections and
the systemd unit install as data into ``<prefix>/share/pvpn``.  pip builds it through PEP 517
(pyproject.toml's [build-system]); never run this file yourself."""

from setuptools import setup

setup(
    packages=[
        "pvpn",
        "pvpn.io",
        "pvpn.nodes",
        "pvpn.cli",
        "pvpn.cli.lab",
        "pvpn.cli.bench",
        "pvpn.client",
        "pvpn.server",
        "pvpn.gateway",
    ],
    package_dir={
        "pvpn": "pvpn",
        "pvpn.client": "client",
        "pvpn.server": "server",
        "pvpn.gateway": "gateway",
    },
    package_data={"pvpn": ["py.typed"]},
    data_files=[("share/pvpn/supervisord.d", ["supervisord.d/pvpn-client.conf",
                                               "supervisord.d/pvpn-server.conf",
                                               "supervisord.d/pvpn-gateway.conf",
                                               "supervisord.d/supervisord.conf"]),
                ("share/pvpn/systemd", ["systemd/pvpn.service"])],
)
