"""Command-line options the WebUI reads before it parses arguments."""


def preload(parser):
    parser.add_argument(
        "--vmix-dir",
        type=str,
        default=None,
        help="Folder with VMix adapters (.safetensors). Default: models/VMix, or the folder set in Settings > VMix.",
    )
