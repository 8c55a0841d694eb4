"""Map the top-level folders onto the `kmd` import namespace.

`daemon/` installs as `kmd.daemon`, `editors/` as `kmd.editors`, `common/` as `kmd.common`, and so on, so the
repository keeps the layout its users asked for without claiming generic top-level
module names (`daemon`, `sources`) in their environments.
"""

from setuptools import find_packages, setup

ROOTS = ("common", "daemon", "editors", "sources", "policies")

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ROOTS:
    package_dir[f"kmd.{root}"] = root
    packages.append(f"kmd.{root}")
    packages += [f"kmd.{root}.{sub}" for sub in find_packages(root)]

setup(
    packages=packages,
    package_dir=package_dir,
    # *.html and *.css: the review console's templates and stylesheet (kmd.daemon.console).
    # trained/*.safetensors: the trained RECIPE editor for the embedded model.
    package_data={
        "": ["*.yaml", "*.yml", "*.json", "*.jsonl", "*.txt", "*.atom", "*.html", "*.css"],
        "kmd.editors.recipe": ["trained/*.safetensors"],
        "kmd.editors.question_check": ["trained/*.safetensors"],
    },
)
