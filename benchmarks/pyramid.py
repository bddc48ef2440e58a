"""mipmap pyramid: build and sample time vs a plain ``clone()`` of the same data; torch vs CuPy on a GPU.

For each input (feature grids 24x24x1024 and 64x64x1024, an image
1024x1024x3) and batch (1, 16):

* ``clone``: ``features.clone()`` -- reads and writes the whole input once,
  the yardstick (target: build <= 2x clone);
* ``build``: every mip level (level 0 is the input, not copied);
* ``sample``: 273 ``tex2DLod`` samples per image (the homunculus budget) at
  random uv and lod;
* feature grids in two layouts: ``NHWC`` is what a token tensor ``[B, H*W, C]``
  becomes as ``view(B, H, W, C).permute(0, 3, 1, 2)`` (channels_last, no copy),
  ``NCHW`` a contiguous ``[B, C, H, W]``;
* on a GPU, the CuPy backend too, and the build's achieved bandwidth
  (bytes read + written over all levels / time) against the device's peak.

Times are the minimum over repeats (a shared CPU makes the median noisy),
after a warm-up; fewer repeats on big inputs.

    python benchmarks/pyramid.py                      # CPU (and GPU when present)
    python benchmarks/pyramid.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console
from rich.table import Table

from _timing import time_ms

from arrcoc_plugins.pyramids import cupy_mipmap, torch_mipmap

#: Peak memory bandwidth (GB/s) of common GPUs, when the device properties do not give it.
KNOWN_BANDWIDTH_GBS = {
    "H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
    "L40S": 864, "L40": 864, "L4": 300, "A10G": 600, "A10": 600, "T4": 320, "V100": 900,
    "RTX 4090": 1008, "RTX 3090": 936,
}

CASES = [  # (label, channels, height, width, layouts)
    ("24x24x1024", 1024, 24, 24, ("NHWC", "NCHW")),
    ("64x64x1024", 1024, 64, 64, ("NHWC", "NCHW")),
    ("image 1024x1024x3", 3, 1024, 1024, ("NCHW",)),
]


def peak_bandwidth_gbs(device: torch.device) -> tuple[float | None, str]:
    """Peak DRAM bandwidth of ``device`` in GB/s and where the number came from."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not (clock_khz and bus_bits) and cupy_mipmap.available()[0]:
        import cupy

        attrs = cupy.cuda.runtime.getDeviceProperties(device.index or 0)
        clock_khz, bus_bits = attrs.get("memoryClockRate"), attrs.get("memoryBusWidth")
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties (2 x memory clock x bus width)"
    for name, gbs in sorted(KNOWN_BANDWIDTH_GBS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in props.name.lower():
            return float(gbs), f"table of known GPUs ({name})"
    return None, "unknown"


def build_bytes(levels: tuple[torch.Tensor, ...]) -> int:
    """Bytes a build must move: each level >= 1 reads its parent and writes itself."""
    sizes = [level.numel() * level.element_size() for level in levels]
    return sum(sizes[i - 1] + sizes[i] for i in range(1, len(sizes)))


def make_features(batch: int, channels: int, height: int, width: int, layout: str, device, dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if layout == "NHWC":  # tokens [B, H*W, C] viewed as [B, C, H, W]: channels_last, no copy
        tokens = torch.randn(batch, height * width, channels, generator=g).to(device=device, dtype=dtype)
        return tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return torch.randn(batch, channels, height, width, generator=g).to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--samples", type=int, default=273, help="samples per image")
    parser.add_argument("--repeats", type=int, default=10, help="repeats on small inputs (3 on inputs over 64 MB)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    use_cupy = on_gpu and cupy_mipmap.available()[0]
    console = Console(width=None if sys.stdout.isatty() else 200)  # no squeezed columns in a pipe or log

    where = torch.cuda.get_device_name(device) if on_gpu else f"{torch.get_num_threads()} threads"
    title = f"mipmap pyramid, {device} ({where}), {args.dtype}"
    table = Table(title=title)
    for column in ("input", "B", "layout", "MB", "levels", "clone ms", "build ms", "build/clone",
                   f"sample ms ({args.samples}/img)"):
        table.add_column(column, justify="right")
    peak, peak_source = (None, "")
    if on_gpu:
        peak, peak_source = peak_bandwidth_gbs(device)
        table.add_column("torch build GB/s", justify="right")
        if use_cupy:
            for column in ("cupy build ms", "cupy sample ms", "cupy build GB/s"):
                table.add_column(column, justify="right")

    for label, channels, height, width, layouts in CASES:
        for batch in args.batches:
            for layout in layouts:
                features = make_features(batch, channels, height, width, layout, device, dtype, seed=batch)
                megabytes = features.numel() * features.element_size() / 2**20
                repeats = args.repeats if megabytes <= 64 else 3
                levels = torch_mipmap.build_mipmap(features)
                g = torch.Generator(device="cpu").manual_seed(0)
                uv = torch.rand(batch, args.samples, 2, generator=g).to(device)
                lod = (torch.rand(batch, args.samples, generator=g) * (len(levels) - 1)).to(device)

                t_clone = time_ms(features.clone, repeats, device, stat="min")
                t_build = time_ms(lambda: torch_mipmap.build_mipmap(features), repeats, device, stat="min")
                t_sample = time_ms(lambda: torch_mipmap.sample_mipmap(levels, uv, lod), repeats, device, stat="min")
                row = [label, str(batch), layout, f"{megabytes:.1f}", str(len(levels)), f"{t_clone:.2f}",
                       f"{t_build:.2f}", f"{t_build / t_clone:.2f}x", f"{t_sample:.2f}"]
                if on_gpu:
                    moved = build_bytes(levels)
                    row.append(f"{moved / t_build / 1e6:.0f}" + (f" ({moved / t_build / 1e6 / peak:.0%})" if peak else ""))
                    if use_cupy:
                        cupy_levels = cupy_mipmap.build_mipmap(features)
                        t_cbuild = time_ms(lambda: cupy_mipmap.build_mipmap(features), repeats, device, stat="min")
                        t_csample = time_ms(lambda: cupy_mipmap.sample_mipmap(cupy_levels, uv, lod), repeats, device, stat="min")
                        gbs = moved / t_cbuild / 1e6
                        row += [f"{t_cbuild:.2f}", f"{t_csample:.2f}",
                                f"{gbs:.0f}" + (f" ({gbs / peak:.0%})" if peak else "")]
                table.add_row(*row)
                del features, levels
    console.print(table)
    if on_gpu:
        console.print(f"peak memory bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'} from {peak_source}; "
                      "GB/s counts each level's parent read + its own write (the build includes one sync for the "
                      "finite check)")
        if not use_cupy:
            console.print(f"CuPy backend not measured: {cupy_mipmap.available()[1]}")
    console.print("clone = features.clone() of the same data; times are the minimum over repeats")


if __name__ == "__main__":
    main()
