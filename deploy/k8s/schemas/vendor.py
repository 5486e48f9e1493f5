"""Turn a CustomResourceDefinition into the JSON schema tests/test_deploy.py validates with:
the served version's openAPIV3Schema, descriptions left out (they are most of a CRD's size and
constrain nothing). The vendored files and where each came from are listed in README.md.

  python deploy/k8s/schemas/vendor.py CRD.yaml VERSION > deploy/k8s/schemas/GROUP_KIND_VERSION.json
"""

import json
import sys

import yaml


def without_descriptions(schema, in_properties=False):
    """The schema less its `description` texts (a property that is named description stays)."""
    if isinstance(schema, list):
        return [without_descriptions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: without_descriptions(value, key == "properties" and not in_properties)
            for key, value in schema.items() if in_properties or key != "description"}


def main(path: str, version: str) -> None:
    crd = yaml.safe_load(open(path))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = without_descriptions(served["schema"]["openAPIV3Schema"])
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
