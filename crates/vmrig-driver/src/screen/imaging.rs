//! Screenshots as images: loading (PPM from QEMU's `screendump`, PNG from users), the
//! preprocessed variants OCR gets besides the raw screen, and PNG output.

use std::path::Path;

use image::imageops;
use image::{DynamicImage, GrayImage, ImageFormat, ImageReader};

/// Reads a PNG or PNM (PPM/PGM) image, whatever its extension says.
pub fn load(path: &Path) -> Result<DynamicImage, String> {
    ImageReader::open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .decode()
        .map_err(|e| {
            format!(
                "cannot decode {} (PNG or PPM expected): {e}",
                path.display()
            )
        })
}

/// Writes `img` as PNG.
pub fn save_png(img: &DynamicImage, path: &Path) -> Result<(), String> {
    img.save_with_format(path, ImageFormat::Png)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes a grayscale image as PGM (fast: no compression; tesseract reads it).
pub fn save_pgm(img: &GrayImage, path: &Path) -> Result<(), String> {
    img.save_with_format(path, ImageFormat::Pnm)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// One preprocessed version of the screen for OCR.
pub struct Variant {
    /// Short name, used in file names and logs.
    pub name: &'static str,
    pub image: GrayImage,
}

/// Scale factor of the processed variants (fixed: [`upscale2x`]): console and terminal fonts are 13-16 px high,
/// tesseract reads best at 20-30 px.
pub const UPSCALE: u32 = 2;

/// The processed variants (the raw screenshot is OCRed as it is, besides these):
/// `gray` (grayscale, upscaled, contrast stretched), `inverted` (the same, negated: dark
/// text on a light background for light-on-dark screens), `threshold` (Otsu binarisation,
/// background white).
pub fn variants(screen: &DynamicImage) -> Vec<Variant> {
    let gray = gray_upscaled(screen);
    let mut inverted = gray.clone();
    imageops::invert(&mut inverted);
    let threshold = binarize(&gray);
    vec![
        Variant {
            name: "gray",
            image: gray,
        },
        Variant {
            name: "inverted",
            image: inverted,
        },
        Variant {
            name: "threshold",
            image: threshold,
        },
    ]
}

/// Grayscale, upscaled by [`UPSCALE`], contrast stretched to 0..=255.
pub fn gray_upscaled(screen: &DynamicImage) -> GrayImage {
    let mut big = upscale2x(&screen.to_luma8());
    stretch_contrast(&mut big);
    big
}

/// Doubles width and height, interpolating linearly between neighbours (simple integer
/// loops: fast even in debug builds, unlike a general resampler).
pub fn upscale2x(img: &GrayImage) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let ow = w * UPSCALE as usize;
    // Each source row doubled horizontally.
    let mut wide = vec![0u8; ow * h];
    for (row, out) in src.chunks_exact(w).zip(wide.chunks_exact_mut(ow)) {
        for (x, pair) in out.chunks_exact_mut(2).enumerate() {
            let a = u16::from(row[x]);
            let b = u16::from(row[(x + 1).min(w - 1)]);
            pair[0] = a as u8;
            pair[1] = (a + b).div_ceil(2) as u8;
        }
    }
    // Then each row doubled vertically.
    let mut out = vec![0u8; ow * h * 2];
    for y in 0..h {
        let a = &wide[y * ow..(y + 1) * ow];
        let b = &wide[(y + 1).min(h - 1) * ow..((y + 1).min(h - 1) + 1) * ow];
        let (even, odd) = out[2 * y * ow..(2 * y + 2) * ow].split_at_mut(ow);
        even.copy_from_slice(a);
        for ((o, &p), &q) in odd.iter_mut().zip(a).zip(b) {
            *o = (u16::from(p) + u16::from(q)).div_ceil(2) as u8;
        }
    }
    GrayImage::from_raw((ow) as u32, (h * 2) as u32, out).expect("sizes agree")
}

/// Maps the darkest pixel to 0 and the brightest to 255 (no-op on a flat image).
pub fn stretch_contrast(img: &mut GrayImage) {
    let raw: &mut [u8] = img;
    let (lo, hi) = raw
        .iter()
        .fold((255u8, 0u8), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    if hi <= lo {
        return;
    }
    let range = u32::from(hi - lo);
    let mut lut = [0u8; 256];
    for (v, out) in lut.iter_mut().enumerate().skip(usize::from(lo)) {
        let v = (v as u32).min(u32::from(hi)) - u32::from(lo);
        *out = ((v * 255 + range / 2) / range) as u8;
    }
    for p in raw.iter_mut() {
        *p = lut[usize::from(*p)];
    }
}

/// Otsu's threshold of a grayscale image: the level that best splits it into two classes.
pub fn otsu_level(img: &GrayImage) -> u8 {
    let mut hist = [0u64; 256];
    for &p in img.as_raw() {
        hist[usize::from(p)] += 1;
    }
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 128;
    }
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &n)| i as f64 * n as f64)
        .sum();
    let (mut w0, mut sum0) = (0u64, 0f64);
    let (mut best, mut best_var) = (0u8, -1f64);
    for (level, &n) in hist.iter().enumerate() {
        w0 += n;
        if w0 == 0 {
            continue;
        }
        let w1 = total - w0;
        if w1 == 0 {
            break;
        }
        sum0 += level as f64 * n as f64;
        let m0 = sum0 / w0 as f64;
        let m1 = (sum_all - sum0) / w1 as f64;
        let var = w0 as f64 * w1 as f64 * (m0 - m1) * (m0 - m1);
        if var > best_var {
            best_var = var;
            best = level as u8;
        }
    }
    best
}

/// Black and white at Otsu's level, with the larger class (the background) white.
pub fn binarize(img: &GrayImage) -> GrayImage {
    let level = otsu_level(img);
    let raw = img.as_raw();
    let above = raw.iter().filter(|&&p| p > level).count();
    let background_is_bright = above * 2 >= raw.len();
    let mut lut = [0u8; 256];
    for (v, out) in lut.iter_mut().enumerate() {
        *out = if (v > usize::from(level)) == background_is_bright {
            255
        } else {
            0
        };
    }
    let data = raw.iter().map(|&p| lut[usize::from(p)]).collect();
    GrayImage::from_raw(img.width(), img.height(), data).expect("same size")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb, RgbImage};

    /// Light gray "text" (a bar) on a dark blue background, like a console.
    fn console_like() -> DynamicImage {
        let mut img = RgbImage::from_pixel(40, 20, Rgb([10, 10, 60]));
        for x in 5..30 {
            for y in 8..12 {
                img.put_pixel(x, y, Rgb([200, 200, 200]));
            }
        }
        DynamicImage::ImageRgb8(img)
    }

    #[test]
    fn variants_are_upscaled_stretched_inverted_and_binarized() {
        let v = variants(&console_like());
        let names: Vec<_> = v.iter().map(|v| v.name).collect();
        assert_eq!(names, ["gray", "inverted", "threshold"]);
        for variant in &v {
            assert_eq!(variant.image.dimensions(), (80, 40), "{}", variant.name);
        }
        let (gray, inverted, threshold) = (&v[0].image, &v[1].image, &v[2].image);
        // Contrast stretched: background black, text white.
        assert_eq!(gray.get_pixel(0, 0)[0], 0);
        assert_eq!(gray.get_pixel(30, 20)[0], 255);
        // Inverted: dark text on white.
        assert_eq!(inverted.get_pixel(0, 0)[0], 255);
        assert_eq!(inverted.get_pixel(30, 20)[0], 0);
        // Thresholded: only black and white, background (the majority) white.
        assert!(threshold.pixels().all(|p| p[0] == 0 || p[0] == 255));
        assert_eq!(threshold.get_pixel(0, 0)[0], 255);
        assert_eq!(threshold.get_pixel(30, 20)[0], 0);
    }

    #[test]
    fn upscaling_doubles_and_interpolates() {
        let img = GrayImage::from_raw(2, 2, vec![0, 100, 200, 50]).unwrap();
        let big = upscale2x(&img);
        assert_eq!(big.dimensions(), (4, 4));
        assert_eq!(
            big.as_raw(),
            &[0, 50, 100, 100, 100, 88, 75, 75, 200, 125, 50, 50, 200, 125, 50, 50]
        );
    }

    #[test]
    fn otsu_splits_two_levels_between_them() {
        let mut img = GrayImage::from_pixel(10, 10, Luma([40]));
        for x in 0..5 {
            for y in 0..10 {
                img.put_pixel(x, y, Luma([200]));
            }
        }
        let level = otsu_level(&img);
        assert!((40..200).contains(&level), "{level}");
        // A flat image stays flat.
        let mut flat = GrayImage::from_pixel(4, 4, Luma([7]));
        stretch_contrast(&mut flat);
        assert!(flat.pixels().all(|p| p[0] == 7));
    }

    #[test]
    fn ppm_and_png_load_alike_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = console_like();
        let rgb = img.to_rgb8();
        // A PPM as QEMU's screendump writes it (binary P6), without an extension.
        let ppm = dir.path().join("screen");
        let mut bytes = format!("P6\n{} {}\n255\n", rgb.width(), rgb.height()).into_bytes();
        bytes.extend_from_slice(rgb.as_raw());
        std::fs::write(&ppm, bytes).unwrap();
        let png = dir.path().join("screen.png");
        save_png(&img, &png).unwrap();
        let a = load(&ppm).unwrap().to_rgb8();
        let b = load(&png).unwrap().to_rgb8();
        assert_eq!(a, rgb);
        assert_eq!(b, rgb);
        let pgm = dir.path().join("gray.pgm");
        save_pgm(&img.to_luma8(), &pgm).unwrap();
        assert_eq!(load(&pgm).unwrap().to_luma8(), img.to_luma8());

        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not an image").unwrap();
        assert!(load(&junk).unwrap_err().contains("cannot decode"));
        assert!(load(&dir.path().join("missing.png"))
            .unwrap_err()
            .contains("cannot open"));
    }
}
