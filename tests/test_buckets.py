"""Aspect-ratio buckets: sd-scripts' table, placement, no-upscale and crops, on hand-computed cases."""

import pytest

from library.data.buckets import BucketSettings, bucket_resolutions, check_bucket_settings, crop_box, place_image

SETTINGS = BucketSettings((512, 512), enable=True, min_reso=256, max_reso=1024, reso_steps=64)
TABLE = bucket_resolutions((512, 512), 256, 1024, 64)


def test_table_for_512_holds_sd_scripts_buckets_and_respects_the_area():
    for reso in [(512, 512), (256, 1024), (1024, 256), (320, 768), (384, 640), (448, 576), (576, 448), (704, 320)]:
        assert reso in TABLE
    assert TABLE == sorted(set(TABLE))
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) for w, h in TABLE)


def test_wide_image_goes_to_the_nearest_aspect_ratio_and_covers_it():
    # 1000x500 has aspect 2.0; (704, 320) is 2.2 (error 0.2), the nearest; (640, 384) is 1.67.
    placement = place_image((1000, 500), SETTINGS, TABLE)
    assert placement.bucket == (704, 320)
    assert placement.resized == (704, 352)  # scaled by 704/1000 so the width fits; the height is cropped
    assert placement.ar_error == pytest.approx(704 / 320 - 2.0)


def test_an_image_of_a_bucket_size_stays_as_it_is():
    placement = place_image((448, 576), SETTINGS, TABLE)
    assert (placement.bucket, placement.resized, placement.ar_error) == ((448, 576), (448, 576), 0.0)


def test_no_upscale_keeps_small_images_and_shrinks_large_ones_to_the_area():
    settings = BucketSettings((512, 512), enable=True, reso_steps=64, no_upscale=True)
    small = place_image((300, 200), settings, TABLE)
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    large = place_image((2000, 1000), settings, TABLE)
    # area 512^2 at aspect 2 is 724x362; rounding the height to 320 keeps the aspect exactly: 640x320.
    assert large.resized == (640, 320) and large.bucket == (640, 320)


def test_without_buckets_every_image_is_covered_and_cropped_to_the_resolution():
    settings = BucketSettings((64, 64))
    placement = place_image((100, 50), settings, [])
    assert placement.bucket == (64, 64) and placement.resized == (128, 64)


def test_crop_box_centred_and_at_random_offsets():
    assert crop_box((704, 352), (704, 320)) == (0, 16, 704, 336)
    assert crop_box((704, 352), (704, 320), (0.0, 0.0)) == (0, 0, 704, 320)
    assert crop_box((704, 352), (704, 320), (0.999, 0.999)) == (0, 32, 704, 352)


@pytest.mark.parametrize("settings, message", [
    (BucketSettings((512, 512), True, 512, 256), "min_bucket_reso = 512 is larger than max_bucket_reso = 256"),
    (BucketSettings((512, 512), True, reso_steps=60), "bucket_reso_steps = 60 must be a positive multiple of 8"),
    (BucketSettings((2048, 2048), True), "must lie within min_bucket_reso 256 and max_bucket_reso 1024"),
    (BucketSettings((500, 500)), "must be a multiple of 8"),
])
def test_bad_bucket_settings_are_named(settings, message):
    problems = check_bucket_settings(settings, "x.toml [[datasets]] #1")
    assert len(problems) == 1 and message in problems[0] and "x.toml [[datasets]] #1" in problems[0]
