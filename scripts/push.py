#!/usr/bin/env python3
"""Push stage: upload the verified GGUF files, a model card and an Ollama Modelfile to HUB_REPO_ID on the Hub.

Refuses unless verify passed on the exported Q8_0: the very file, by its content (sha256), not its time stamp.
HF_TOKEN comes from the environment or .env only. Creates the repo when missing (private unless HUB_PRIVATE=false);
files already there with the same content are not sent again, so an interrupted push continues. A network failure
(or no answer within HUB_TIMEOUT seconds) is one line. `--dry-run` lists what would go where (sizes,
sha256) and needs no token. The card and Modelfile are also written to RUN_DIR/push/.
"""
from cotune.cli import StageTimer, parse_settings, stage_lock, stage_parser
from cotune.errors import run_main


def main(argv=None):
    parser = stage_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; needs no token")
    args, settings = parse_settings(parser, argv)
    timer = StageTimer("push")
    from cotune.push import run_push_stage

    with stage_lock(settings.stage_dir("push"), "push"):
        result = run_push_stage(settings, args.dry_run)
    verb = "would upload" if result["dry_run"] else "uploaded"
    for f in result["files"]:
        sent = result["dry_run"] or f["path"] in result["uploaded"]
        print(f"  {f['path']:<48} {f['bytes']:>12} bytes  sha256 {f['sha256']}  "
              f"{'-> ' + result['repo_id'] if sent else '(unchanged on the Hub)'}")
    if not result["dry_run"] and not result["uploaded"]:
        print(f"{result['repo_id']} already holds every file unchanged; nothing uploaded")
    timer.done(f"{verb} {len(result['files'] if result['dry_run'] else result['uploaded'])} file(s) "
               f"to {result['repo_id']}")


if __name__ == "__main__":
    run_main(main)
