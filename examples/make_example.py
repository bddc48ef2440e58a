"""Draw the bundled example image ``examples/kitchen_table.png`` (224 x 224).

A small synthetic scene — a wooden table with a red apple, a blue mug, a
green book and a striped wall — so that the demo needs no download.  Run
``python examples/make_example.py`` to redraw it; the output is deterministic.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 224


def draw() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (236, 228, 210))
    d = ImageDraw.Draw(image)
    for x in range(0, SIZE, 16):  # striped wallpaper
        d.rectangle([x, 0, x + 7, 120], fill=(214, 200, 178))
    d.rectangle([150, 18, 206, 70], fill=(120, 170, 220), outline=(60, 60, 60), width=3)  # window
    d.line([178, 18, 178, 70], fill=(60, 60, 60), width=2)
    d.line([150, 44, 206, 44], fill=(60, 60, 60), width=2)
    d.rectangle([0, 120, SIZE, SIZE], fill=(150, 98, 52))  # table top
    for y in range(128, SIZE, 12):  # wood grain
        d.line([0, y, SIZE, y + 3], fill=(134, 86, 44), width=1)
    d.ellipse([30, 132, 80, 182], fill=(200, 30, 40), outline=(120, 10, 20), width=2)  # apple
    d.rectangle([53, 122, 57, 134], fill=(90, 60, 20))
    d.ellipse([58, 120, 74, 130], fill=(60, 150, 50))
    d.rectangle([104, 120, 144, 176], fill=(40, 80, 190), outline=(20, 40, 110), width=2)  # mug
    d.arc([136, 130, 162, 162], start=270, end=90, fill=(40, 80, 190), width=6)
    d.ellipse([104, 114, 144, 126], fill=(70, 110, 210), outline=(20, 40, 110), width=2)
    d.polygon([(160, 190), (214, 180), (220, 206), (166, 216)], fill=(40, 140, 70), outline=(20, 80, 40))  # book
    d.line([(166, 198), (216, 189)], fill=(230, 230, 210), width=2)
    return image


def main() -> Path:
    path = Path(__file__).with_name("kitchen_table.png")
    draw().save(path, optimize=True)
    return path


if __name__ == "__main__":
    print(main())
