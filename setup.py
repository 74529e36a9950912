"""pip install of mosaic_ros (the venv build): the Python package and its console scripts.

On a ROS 2 machine colcon builds the package with CMakeLists.txt instead (package.xml says
ament_cmake); that build also generates the msg/srv/action interfaces. scripts/setup does both
in the venv: CMake for the interfaces, then this file in editable mode for the sources.
"""

import xml.etree.ElementTree as ET
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "mosaic_ros"
HERE = Path(__file__).resolve().parent


def package_xml_version() -> str:
    """The version from package.xml, so that the two build paths cannot disagree."""
    return ET.parse(HERE / "package.xml").getroot().findtext("version").strip()


setup(
    name=PACKAGE,
    version=package_xml_version(),
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", sorted(glob("launch/*.py"))),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml"))),
    ],
    zip_safe=False,
    entry_points={
        "console_scripts": [
            "mosaic-ros-run=mosaic_ros.cli.run:main",
            "mosaic-ros-bench=mosaic_ros.cli.bench:main",
            "mosaic-ros-stream=mosaic_ros.nodes.stream_main:main",
            "mosaic-ros-ask=mosaic_ros.nodes.ask_client:main",
            "mosaic-ros-bag=mosaic_ros.nodes.bag_tool:main",
            "mosaic-ros-demo=mosaic_ros.nodes.demo:main",
        ],
    },
)
