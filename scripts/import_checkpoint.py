"""Import the authors' released weights: `python scripts/import_checkpoint.py src=PATH.pth.tar out=PATH.pt`.

Extra `key=value` arguments override the released preset's config (e.g. model.coord_units=unit).
What the import maps and drops: cliphand3d/apps/released.py and docs/released.md.
"""
import json
import sys

from cliphand3d.apps.cli import friendly_errors
from cliphand3d.apps.released import import_released


def main(argv):
    args = dict(a.split("=", 1) for a in argv if a.startswith(("src=", "out=")))
    overrides = [a for a in argv if not a.startswith(("src=", "out="))]
    if set(args) != {"src", "out"}:
        raise SystemExit("usage: python scripts/import_checkpoint.py src=CLIP_Hand_3D_PE_0604_44.pth.tar "
                         "out=checkpoints/released.pt [config overrides ...]")
    with friendly_errors():
        info = import_released(args["src"], args["out"], overrides)
    print(json.dumps({k: v for k, v in info.items() if k != "dropped"}, indent=2))
    print(f"dropped {len(info['dropped'])} training-only tensors (mask decoder, unused logit scales): "
          + ", ".join(sorted({k.split('.')[0] for k in info["dropped"]})))
    print(f"written {args['out']}; evaluate it with: python scripts/eval.py ckpt={args['out']} data=freihand "
          "data.root=...")


if __name__ == "__main__":
    main(sys.argv[1:])
