"""Stage 3 of training: the images (folders and list files, or tar shards) -> multi-crop -> per-rank batches,
and the run folder's cached file list that makes a resume start in seconds."""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from torch.utils.data import DataLoader

from swavkit.runtime import distributed
from swavkit.config import Config, ConfigError
from swavkit.data import (BUNDLED_SAMPLE, EpochSampler, UnlabeledImageFolder, check_readable, printable_path)
from swavkit.data.filelist import CACHE_NAME, PathList, load_path_cache, save_path_cache, source_key
from swavkit.data.device_decode import (EncodedCrops, collate_encoded, encoded_or_rgb, read_encoded)
from swavkit.errors import DataError
from swavkit.data.shards import (SHARD_INDEX, ShardStream, check_decodable, expand_shards, is_shard_spec, pass_batch,
                                  stored_count)
from swavkit.data.sources import data_specs, describe_specs, resolve_images
from swavkit.data.multicrop import MultiCropTransform
from swavkit.training.presets import typical_side_px
from swavkit.artifacts.rundir import RunFolder
from swavkit.training.monitor import monitor_folders
from swavkit.config import mean_std_from_data
from swavkit.training.channels import channel_crops, resolve_mean_std
from swavkit.data.channels import ChannelReader
from swavkit.data.constants import is_rgb8
from swavkit.training.processes import Processes


@dataclass
class TrainingData:
    """Stage 3: the per-rank batches and how many steps they make."""
    transform: MultiCropTransform
    dataset: UnlabeledImageFolder | ShardStream
    sampler: EpochSampler | ShardStream  # set_epoch(epoch, start=samples this rank already used)
    loader: DataLoader
    per_rank_batch: int
    steps_per_epoch: int
    total_steps: int
    file_list: PathList | None = None  # folders and list files: what the run folder caches for a resume
    file_list_source: str = ""


def build_data(cfg: Config, procs: Processes, files: RunFolder, resuming: bool) -> TrainingData:
    named = data_specs(cfg.data.path, cfg.data.paths)
    specs = named or [str(BUNDLED_SAMPLE / "train")]
    if any(is_shard_spec(spec) for spec in specs):
        return _build_shard_data(cfg, procs, specs, files, resuming)
    shown = describe_specs(specs)
    paths, from_cache = resolve_file_list(specs, procs, files, resuming)
    channels, bit_depth = cfg.data.channels, cfg.data.bit_depth
    reader = None if is_rgb8(channels, bit_depth) else ChannelReader(channels, bit_depth)
    check_readable(paths, shown, reader)  # reader None: 8-bit RGB (read_rgb); else swavkit.data.channels
    per_rank_batch = cfg.train.batch_size // procs.world
    if len(paths) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} is larger than the "
                          f"{len(paths)} images in {shown}; lower it")
    if cfg.monitor.knn_data:
        monitor_folders(cfg)  # a wrong monitoring folder should fail now, not after the first epoch
    resolve_mean_std(cfg, paths, procs.say, procs.is_main, distributed.broadcast_object)  # crops.mean=[] etc.
    # reader None: PIL RGB images; else data.channels / data.bit_depth arrays (swavkit.data.channels)
    transform = MultiCropTransform.from_config(cfg.crops) if reader is None else channel_crops(cfg, procs.say)
    if procs.decode_on_device:  # workers keep JPEGs encoded; _next_batch decodes them (swavkit.data.device_decode)
        dataset = UnlabeledImageFolder(shown, EncodedCrops(transform), paths=paths, reader=read_encoded)
    else:
        dataset = UnlabeledImageFolder(shown, transform, paths=paths, reader=reader)
    sampler = EpochSampler(len(paths), procs.rank, procs.world, cfg.seed)
    workers, on_gpu = cfg.data.num_workers, procs.device.type == "cuda"
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=_worker_collate(transform, procs),
                        pin_memory=cfg.data.pin_memory and on_gpu, persistent_workers=workers > 0,
                        prefetch_factor=cfg.data.prefetch_factor if workers else None)
    warn_about_crops(cfg, procs, typical_side_px(paths, sample=50))
    steps_per_epoch = len(sampler) // per_rank_batch
    n_crops = sum(cfg.crops.counts)
    procs.say(f"data: {len(paths)} images in {shown}"
              + (" (bundled Fashion-MNIST sample, MIT licence)" if not named else "")
              + f"; {n_crops} crops each ({' + '.join(f'{c}x{s}px' for c, s in zip(cfg.crops.counts, cfg.crops.sizes_px))}); "
              f"{steps_per_epoch} steps/epoch at global batch {cfg.train.batch_size} ({procs.world} process(es)); colour ops "
              + _colour_where(procs))
    return TrainingData(transform, dataset, sampler, loader, per_rank_batch, steps_per_epoch,
                 steps_per_epoch * cfg.train.epochs, file_list=None if from_cache else paths,
                 file_list_source=source_key(specs))


def _build_shard_data(cfg: Config, procs: Processes, specs: list[str], files: RunFolder, resuming: bool) -> TrainingData:
    """Stage 3 for WebDataset shards: a stream of per-rank batches (swavkit.data.shards), an epoch of
    data.samples_per_epoch images."""
    if not is_rgb8(cfg.data.channels, cfg.data.bit_depth):
        raise DataError(f"data.path: shards are decoded as 8-bit RGB; with data.channels={cfg.data.channels} "
                        f"data.bit_depth={cfg.data.bit_depth} give a folder or a list of the image files")
    if mean_std_from_data(cfg):
        raise DataError("crops.mean/crops.std: computing them from the data needs a folder or list of images, not "
                        "shards; give their values")
    if len(specs) > 1:
        raise DataError("data.paths: shards cannot be mixed with other sources; name all shards in one brace "
                        "pattern, glob or list of .tar files in data.path")
    if resuming:
        say_if_stream_layout_changed(cfg, procs, files)
    # a set with no decodable image fails here, in one line, rather than in a stream that never makes a batch
    shards = distributed.broadcast_object(check_decodable(expand_shards(specs[0]), specs[0]) if procs.is_main else None)
    samples_per_epoch = cfg.data.samples_per_epoch or stored_count(shards)
    if not samples_per_epoch:
        raise ConfigError(f"data.samples_per_epoch: {printable_path(specs[0])} has no image count ({SHARD_INDEX} "
                          "next to the shards, written by swavkit shard); set data.samples_per_epoch")
    workers, slots = cfg.data.num_workers, procs.world * max(1, cfg.data.num_workers)
    if len(shards) < slots:
        raise ConfigError(f"data.num_workers: {len(shards)} shard(s) for {procs.world} process(es) x "
                          f"{max(1, workers)} reader(s); each reader needs shards of its own: lower "
                          "data.num_workers or shard with fewer --images-per-shard")
    per_rank_batch = cfg.train.batch_size // procs.world
    steps_per_epoch = samples_per_epoch // procs.world // per_rank_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} is larger than the "
                          f"{samples_per_epoch} images of an epoch; lower it")
    if cfg.monitor.knn_data:
        monitor_folders(cfg)
    transform = MultiCropTransform.from_config(cfg.crops)
    decode = dict(decode=encoded_or_rgb) if procs.decode_on_device else {}
    stream = ShardStream(shards, EncodedCrops(transform) if procs.decode_on_device else transform,
                         _worker_collate(transform, procs), per_rank_batch, rank=procs.rank, world=procs.world,
                         seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer, samples_per_epoch=samples_per_epoch,
                         **decode)
    # Workers restart each epoch (not persistent): they take the epoch and resume position from the stream.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=pass_batch,
                        pin_memory=cfg.data.pin_memory and procs.device.type == "cuda",
                        prefetch_factor=cfg.data.prefetch_factor if workers else None)
    procs.say(f"data: {len(shards)} shard(s) {printable_path(specs[0])}, {samples_per_epoch} images/epoch, shuffle "
              f"buffer {cfg.data.shuffle_buffer}; {steps_per_epoch} steps/epoch at global batch {cfg.train.batch_size} "
              f"({procs.world} process(es)); colour ops "
              + _colour_where(procs))
    return TrainingData(transform, stream, stream, loader, per_rank_batch, steps_per_epoch, steps_per_epoch * cfg.train.epochs)


def _worker_collate(transform: MultiCropTransform, procs: Processes):
    """What the data workers hand over per batch: encoded JPEGs, uint8 crops, or finished views."""
    if procs.decode_on_device:
        return collate_encoded
    return transform.collate_pixels if procs.colour_on_device else transform.collate


def _colour_where(procs: Processes) -> str:
    """The data banner's last words: where decoding and the colour ops run."""
    if procs.decode_on_device:
        return f"on {procs.device.type}, JPEGs decoded there too (data.decode_on_device)"
    return f"on {procs.device.type} (data.colour_on_device)" if procs.colour_on_device else "in the data workers"


def say_if_stream_layout_changed(cfg: Config, procs: Processes, files: RunFolder) -> None:
    """A shard stream resumes exactly only with the data.num_workers of the interrupted run (swavkit.data.shards);
    its config.yaml, not yet rewritten at this stage, says which that was."""
    try:
        before = (yaml.safe_load(files.config.read_text(encoding="utf-8")) or {}).get("data", {}).get("num_workers")
    except (OSError, yaml.YAMLError, AttributeError):
        return
    if isinstance(before, int) and before != cfg.data.num_workers:
        procs.say(f"resume: data.num_workers changed from {before} to {cfg.data.num_workers}: the rest of the "
                  "interrupted epoch is read by other shard readers, so some of its images may repeat or be left "
                  "out; the following epochs are exact again")


def resolve_file_list(specs: list[str], procs: Processes, files: RunFolder,
                       resuming: bool) -> tuple[PathList, bool]:
    """(the images of folders / list files, compact; whether they came from the cache). Rank 0 resolves
    them (a resume reads the run folder's cache instead of walking again) and every rank takes its list: files added or removed between two
    walks would otherwise give the ranks different epochs (and a hang at the first mismatched collective)."""
    paths, from_cache = None, False
    if procs.is_main:
        if resuming:
            paths, why = load_path_cache(files.path, source_key(specs))
            from_cache = paths is not None
        if from_cache:
            procs.say(f"data: file list read from {printable_path(files.path / CACHE_NAME)} (no walk)")
        else:
            if resuming:
                procs.say(f"data: {why}; finding the images again")
            paths = resolve_images(specs)
    paths = distributed.broadcast_object(paths)
    return paths, distributed.broadcast_object(from_cache)


def cache_file_list(data: TrainingData, procs: Processes, files: RunFolder) -> None:
    """After the run folder is started (stage 7): rank 0 keeps the resolved file list for a resume (not
    rewritten when it was read from there)."""
    if procs.is_main and data.file_list is not None:
        save_path_cache(files.path, data.file_list, data.file_list_source)


def warn_about_crops(cfg: Config, procs: Processes, typical_side: int) -> None:
    if cfg.crops.sizes_px[0] > 2 * typical_side:
        procs.say(f"warning: crops.sizes_px[0]={cfg.crops.sizes_px[0]} is over twice the typical image side "
                  f"({typical_side} px): crops are upsampled and small crops hold almost nothing; use smaller "
                  "crops or --auto")
    if procs.device.type == "cpu" and procs.precision == "bf16" and min(cfg.crops.sizes_px) < 32:
        # Measured with torch 2.14.1: the CPU bf16 weight gradient of a stride-2 3x3 convolution whose input
        # is 1x1 (a ResNet's last stage on crops under 32 px) is garbage or NaN in most calls.
        procs.say(f"warning: train.precision=bf16 on CPU with {min(cfg.crops.sizes_px)} px crops: torch's CPU bf16 "
                  "convolutions return corrupt gradients on 1x1 feature maps; use train.precision=fp32 (bad steps "
                  "are detected and skipped, see train.skip_nonfinite_steps)")
