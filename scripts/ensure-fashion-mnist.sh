#!/bin/sh
# Make sure Fashion-MNIST's four IDX .gz files are where `nas` looks for them:
# NAS_DATA_DIR if set, else Debian's /usr/share/datasets/fashion-mnist. Nothing is downloaded
# except through apt (Debian package dataset-fashion-mnist).
dir="${NAS_DATA_DIR:-/usr/share/datasets/fashion-mnist}"
have_all() {
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [ -f "$dir/$f.gz" ] || return 1
    done
}
have_all && exit 0
if [ -n "${NAS_DATA_DIR:-}" ]; then
    echo "Fashion-MNIST: NAS_DATA_DIR=$dir lacks the four IDX .gz files (train-images-idx3-ubyte.gz, ...); put them there or unset NAS_DATA_DIR" >&2
    exit 1
fi
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
    if [ "$SUDO" != none ]; then
        echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist ..."
        $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null
        have_all && exit 0
    fi
fi
echo "Fashion-MNIST not found in $dir and could not be installed with apt; get the four IDX .gz files and run with --data-dir DIR or NAS_DATA_DIR=DIR" >&2
exit 1
