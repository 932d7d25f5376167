"""Re-vendors the console's front-end libraries into serve/http/console/vendor/ (run after editing console/package.json).

`npm ci` installs the versions pinned in console/package-lock.json into console/node_modules/ (ignored by
git), then the built files the page loads and each library's LICENSE are copied, and VERSIONS.json
records what was copied. Nothing is built: the page loads these files as they ship (ES modules and one
minified script), so installing the wheel needs no JavaScript toolchain. Run `python tools/vendor_console.py`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPM_DIR = ROOT / "console"
VENDOR = ROOT / "serve" / "http" / "console" / "vendor"
# package -> (file in the package -> name in vendor/); the LICENSE is copied as <package>.LICENSE
FILES = {
    "preact": {"dist/preact.mjs": "preact.mjs", "hooks/dist/hooks.mjs": "preact-hooks.mjs"},
    "htm": {"dist/htm.module.js": "htm.mjs"},
    "uplot": {"dist/uPlot.iife.min.js": "uPlot.iife.min.js", "dist/uPlot.min.css": "uPlot.min.css"},
}


def main() -> None:
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=NPM_DIR, check=True)
    tmp = VENDOR.with_name("vendor.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    versions = {}
    for pkg, files in FILES.items():
        src = NPM_DIR / "node_modules" / pkg
        for rel, name in files.items():
            shutil.copyfile(src / rel, tmp / name)
        shutil.copyfile(src / "LICENSE", tmp / f"{pkg}.LICENSE")
        meta = json.loads((src / "package.json").read_text())
        versions[pkg] = {"version": meta["version"], "license": meta["license"], "files": sorted(files.values())}
    (tmp / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    shutil.rmtree(VENDOR, ignore_errors=True)  # swap the whole folder: no mix of old and new files
    tmp.rename(VENDOR)
    names = ", ".join(f"{p} {v['version']}" for p, v in versions.items())
    print(f"vendored {names} into {VENDOR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
