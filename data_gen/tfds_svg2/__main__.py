"""python -m data_gen.tfds_svg2 SHARD_DIR: write the TFDS metadata next to the shards."""
import argparse
import json

from data_gen.tfds_svg2 import dataset_info, write_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shard_dir", help="a directory written by data_gen.shards.ShardWriter")
    args = parser.parse_args()
    write_metadata(args.shard_dir)
    info = dataset_info(args.shard_dir)
    print(json.dumps({"dataset": info.name, "version": str(info.version), "file_format": info.file_format.value,
                      "splits": {name: split.num_examples for name, split in info.splits.items()}}))


if __name__ == "__main__":
    main()
