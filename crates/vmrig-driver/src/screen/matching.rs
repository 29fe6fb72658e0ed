//! Finding a reference image anywhere on the screen: normalized cross-correlation (the
//! zero-mean kind, OpenCV's `TM_CCOEFF_NORMED`) at every position, computed with FFTs and
//! integral images (J. P. Lewis, "Fast Normalized Cross-Correlation"), so a whole screen
//! costs a few FFTs of its size instead of one multiply per screen pixel per template pixel.
//!
//! Scores run from -1 to 1; 1 is a pixel-exact match up to brightness and contrast.

use image::GrayImage;
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

/// The best position of a template on a screen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    /// Top-left corner of the template on the screen.
    pub x: u32,
    pub y: u32,
    pub score: f64,
}

/// A window whose pixels vary less than this (in squared 0..1 units, summed) is flat.
const FLAT: f64 = 1e-6;

/// The position where `template` best matches `screen`.
pub fn best_match(screen: &GrayImage, template: &GrayImage) -> Result<Match, String> {
    let (sw, sh) = (screen.width() as usize, screen.height() as usize);
    let (tw, th) = (template.width() as usize, template.height() as usize);
    if tw == 0 || th == 0 {
        return Err("the reference image is empty".into());
    }
    if tw > sw || th > sh {
        return Err(format!(
            "the reference image ({tw}x{th}) is larger than the screen ({sw}x{sh})"
        ));
    }
    let n = (tw * th) as f64;
    let t: Vec<f64> = template.pixels().map(|p| f64::from(p[0]) / 255.0).collect();
    let t_mean = t.iter().sum::<f64>() / n;
    let t_norm = t.iter().map(|v| (v - t_mean).powi(2)).sum::<f64>().sqrt();
    if t_norm * t_norm < FLAT {
        return Err(
            "the reference image is a single flat colour; it would match any flat area".into(),
        );
    }

    // Cross-correlation of the screen with the zero-mean template, by FFT. Circular
    // correlation over the screen's size is exact at every position where the template
    // fits, which are the only ones read.
    let mut planner = FftPlanner::<f64>::new();
    let mut a: Vec<Complex<f64>> = screen
        .as_raw()
        .iter()
        .map(|&p| Complex::new(f64::from(p) / 255.0, 0.0))
        .collect();
    let mut b = vec![Complex::new(0.0, 0.0); sw * sh];
    for y in 0..th {
        for x in 0..tw {
            b[y * sw + x] = Complex::new(t[y * tw + x] - t_mean, 0.0);
        }
    }
    let a = fft2(&mut planner, &mut a, sw, sh);
    let b = fft2(&mut planner, &mut b, sw, sh);
    let mut c: Vec<Complex<f64>> = a.iter().zip(&b).map(|(a, b)| a * b.conj()).collect();
    let corr = ifft2(&mut planner, &mut c, sw, sh);

    // Window sums of the screen and its square, from integral images.
    let stride = sw + 1;
    let mut s1 = vec![0f64; stride * (sh + 1)];
    let mut s2 = vec![0f64; stride * (sh + 1)];
    let raw = screen.as_raw();
    for y in 0..sh {
        let (mut r1, mut r2) = (0f64, 0f64);
        let (above, here) = (y * stride, (y + 1) * stride);
        for (x, &p) in raw[y * sw..(y + 1) * sw].iter().enumerate() {
            let v = f64::from(p) / 255.0;
            r1 += v;
            r2 += v * v;
            s1[here + x + 1] = s1[above + x + 1] + r1;
            s2[here + x + 1] = s2[above + x + 1] + r2;
        }
    }

    let mut best = Match {
        x: 0,
        y: 0,
        score: f64::NEG_INFINITY,
    };
    for y in 0..=(sh - th) {
        let (top, bottom) = (y * stride, (y + th) * stride);
        for x in 0..=(sw - tw) {
            let (a, b, c, d) = (top + x, top + x + tw, bottom + x, bottom + x + tw);
            let sum = s1[d] - s1[b] - s1[c] + s1[a];
            let var = (s2[d] - s2[b] - s2[c] + s2[a]) - sum * sum / n;
            let score = if var < FLAT {
                0.0
            } else {
                (corr[y * sw + x] / (var.sqrt() * t_norm)).clamp(-1.0, 1.0)
            };
            if score > best.score {
                best = Match {
                    x: x as u32,
                    y: y as u32,
                    score,
                };
            }
        }
    }
    Ok(best)
}

/// 2-D FFT of a row-major `w`x`h` buffer; the result is column-major (transposed).
fn fft2(
    planner: &mut FftPlanner<f64>,
    data: &mut [Complex<f64>],
    w: usize,
    h: usize,
) -> Vec<Complex<f64>> {
    planner.plan_fft_forward(w).process(data);
    let mut t = transpose(data, w, h);
    planner.plan_fft_forward(h).process(&mut t);
    t
}

/// Inverse of [`fft2`]: takes its column-major output, gives the real part, row-major,
/// normalized.
fn ifft2(planner: &mut FftPlanner<f64>, data: &mut [Complex<f64>], w: usize, h: usize) -> Vec<f64> {
    planner.plan_fft_inverse(h).process(data);
    let mut rows = transpose(data, h, w);
    planner.plan_fft_inverse(w).process(&mut rows);
    let scale = (w * h) as f64;
    rows.iter().map(|c| c.re / scale).collect()
}

/// Transposes a row-major `w`x`h` matrix into a row-major `h`x`w` one.
fn transpose(data: &[Complex<f64>], w: usize, h: usize) -> Vec<Complex<f64>> {
    let mut out = vec![Complex::new(0.0, 0.0); w * h];
    const BLOCK: usize = 32;
    for by in (0..h).step_by(BLOCK) {
        for bx in (0..w).step_by(BLOCK) {
            for y in by..(by + BLOCK).min(h) {
                for x in bx..(bx + BLOCK).min(w) {
                    out[x * h + y] = data[y * w + x];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    /// Deterministic noise with some structure.
    fn noise(w: u32, h: u32, seed: u64) -> GrayImage {
        let mut state = seed;
        GrayImage::from_fn(w, h, |_, _| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Luma([(state >> 56) as u8])
        })
    }

    fn crop(img: &GrayImage, x: u32, y: u32, w: u32, h: u32) -> GrayImage {
        image::imageops::crop_imm(img, x, y, w, h).to_image()
    }

    /// Direct NCC at one position, to check the FFT path against.
    fn direct(screen: &GrayImage, t: &GrayImage, x: u32, y: u32) -> f64 {
        let n = f64::from(t.width() * t.height());
        let win: Vec<f64> = (0..t.height())
            .flat_map(|j| (0..t.width()).map(move |i| (i, j)))
            .map(|(i, j)| f64::from(screen.get_pixel(x + i, y + j)[0]))
            .collect();
        let tv: Vec<f64> = t.pixels().map(|p| f64::from(p[0])).collect();
        let (mw, mt) = (win.iter().sum::<f64>() / n, tv.iter().sum::<f64>() / n);
        let num: f64 = win.iter().zip(&tv).map(|(a, b)| (a - mw) * (b - mt)).sum();
        let da: f64 = win.iter().map(|a| (a - mw).powi(2)).sum::<f64>().sqrt();
        let db: f64 = tv.iter().map(|b| (b - mt).powi(2)).sum::<f64>().sqrt();
        num / (da * db)
    }

    #[test]
    fn finds_a_crop_where_it_was_cut() {
        let screen = noise(160, 100, 1);
        let template = crop(&screen, 37, 21, 30, 20);
        let m = best_match(&screen, &template).unwrap();
        assert_eq!((m.x, m.y), (37, 21));
        assert!(m.score > 0.9999, "{m:?}");
        // At the edge too (the circular correlation must not wrap there).
        let corner = crop(&screen, 130, 80, 30, 20);
        let m = best_match(&screen, &corner).unwrap();
        assert_eq!((m.x, m.y, m.score > 0.9999), (130, 80, true));
    }

    #[test]
    fn brightness_and_contrast_do_not_matter_but_content_does() {
        let screen = noise(120, 90, 2);
        let mut dimmer = crop(&screen, 50, 40, 25, 25);
        for p in dimmer.pixels_mut() {
            p[0] = p[0] / 2 + 20;
        }
        let m = best_match(&screen, &dimmer).unwrap();
        assert_eq!((m.x, m.y), (50, 40));
        assert!(m.score > 0.99, "{m:?}");

        let other = noise(25, 25, 99);
        let m = best_match(&screen, &other).unwrap();
        assert!(m.score < 0.6, "unrelated noise scored {m:?}");
    }

    #[test]
    fn fft_scores_equal_direct_scores() {
        let screen = noise(37, 23, 3);
        let template = noise(7, 5, 4);
        let m = best_match(&screen, &template).unwrap();
        let mut best = (0, 0, f64::NEG_INFINITY);
        for y in 0..=(23 - 5) {
            for x in 0..=(37 - 7) {
                let s = direct(&screen, &template, x, y);
                if s > best.2 {
                    best = (x, y, s);
                }
            }
        }
        assert_eq!((m.x, m.y), (best.0, best.1));
        assert!((m.score - best.2).abs() < 1e-9, "{m:?} vs {best:?}");
    }

    #[test]
    fn impossible_templates_are_refused() {
        let screen = noise(20, 20, 5);
        assert!(best_match(&screen, &noise(21, 5, 6))
            .unwrap_err()
            .contains("larger than the screen"));
        assert!(best_match(&screen, &GrayImage::from_pixel(4, 4, Luma([9])))
            .unwrap_err()
            .contains("flat"));
        // A flat screen area never matches a textured template.
        let flat = GrayImage::from_pixel(20, 20, Luma([50]));
        assert_eq!(best_match(&flat, &noise(5, 5, 7)).unwrap().score, 0.0);
    }
}
