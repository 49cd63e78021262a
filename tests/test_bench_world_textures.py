"""The named-texture reader of bench/world_textures.py, on renders (its ceiling)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_world_textures", Path(__file__).parents[1] / "bench" / "world_textures.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_spectrum_reader_tells_the_named_textures_apart_on_renders():
    from studio.world.pretrain import texture_words
    from studio.world.render import TEXTURE_CATALOGUE, render

    textures = texture_words(len(TEXTURE_CATALOGUE))
    names, refs = bench.references(textures, per_colour=2)
    assert names == [t.word for t in textures] + ["striped", "dotted"] and refs.shape[0] == len(names)
    reads = {t.word: [bench.read(render(bench.object_scene(c), 500 + s, textures=(t,)), names, refs)
                      for c in bench.COLOURS for s in range(2)] for t in textures}
    right = sum(r == w for w, rs in reads.items() for r in rs) / sum(len(rs) for rs in reads.values())
    assert right > 0.9, reads  # fresh renders (other seeds than the references') read as their own texture
    assert all(sum(r == w for r in rs) >= 4 for w, rs in reads.items()), reads
    # the world's own styles: flat reads flat, striped and dotted read as themselves
    for style in ("flat", "striped", "dotted"):
        assert [bench.read(render(bench.object_scene(c, style), 7), names, refs) for c in bench.COLOURS] == [style] * 4
