//! Reader for OpenSTL's preprocessed crowd-flow archive `dataset.npz` (arrays `X_train`,
//! `Y_train`, `X_test`, `Y_test`, each `[N, T, C, H, W]`, or `[N, T, H, W]` for one channel).

use std::io::Read;
use std::path::Path;

use super::series::WindowSet;
use crate::error::{Error, Result};

/// One array of an `.npy` member, as f32 with its shape.
#[derive(Debug)]
struct NpyArray {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// The train and test windows of an OpenSTL `dataset.npz`.
pub struct NpzWindows {
    pub train: WindowSet,
    pub test: WindowSet,
}

fn format_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Format { path: path.to_path_buf(), format: "npz (zip of .npy)", detail: detail.into() }
}

/// Reads the four arrays and checks that their shapes agree.
pub fn read(path: &Path) -> Result<NpzWindows> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format_err(path, e.to_string()))?;
    let mut load = |name: &str| -> Result<NpyArray> {
        let mut member = archive.by_name(&format!("{name}.npy")).map_err(|_| Error::MissingField {
            path: path.to_path_buf(),
            field: name.into(),
            expected: "an array [N, T, C, H, W] (OpenSTL dataset.npz)".into(),
        })?;
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
        parse_npy(&bytes).map_err(|detail| Error::BadField { path: path.to_path_buf(), field: name.into(), detail })
    };
    let (xtr, ytr, xte, yte) = (load("X_train")?, load("Y_train")?, load("X_test")?, load("Y_test")?);
    let train = pair(path, ("X_train", xtr), ("Y_train", ytr))?;
    let test = pair(path, ("X_test", xte), ("Y_test", yte))?;
    if (train.channels, train.height, train.width) != (test.channels, test.height, test.width) {
        return Err(Error::BadField {
            path: path.to_path_buf(),
            field: "X_test".into(),
            detail: format!(
                "has frames of {}x{}x{}; X_train has {}x{}x{}",
                test.channels, test.height, test.width, train.channels, train.height, train.width
            ),
        });
    }
    Ok(NpzWindows { train, test })
}

fn split_shape(shape: &[usize]) -> Option<(usize, usize, [usize; 3])> {
    match *shape {
        [n, t, c, h, w] => Some((n, t, [c, h, w])),
        [n, t, h, w] => Some((n, t, [1, h, w])),
        _ => None,
    }
}

fn pair(path: &Path, (xn, x): (&str, NpyArray), (yn, y): (&str, NpyArray)) -> Result<WindowSet> {
    let bad = |field: &str, detail: String| Error::BadField { path: path.to_path_buf(), field: field.into(), detail };
    let (n, t_in, chw) = split_shape(&x.shape)
        .ok_or_else(|| bad(xn, format!("has shape {:?}; expected [N, T, C, H, W] or [N, T, H, W]", x.shape)))?;
    let (ny, t_out, chw_y) = split_shape(&y.shape)
        .ok_or_else(|| bad(yn, format!("has shape {:?}; expected [N, T, C, H, W] or [N, T, H, W]", y.shape)))?;
    if ny != n || chw_y != chw {
        return Err(bad(yn, format!("has shape {:?}, which does not match {xn} {:?}", y.shape, x.shape)));
    }
    for (name, arr) in [(xn, &x), (yn, &y)] {
        if let Some(i) = arr.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::BadValues {
                path: path.to_path_buf(),
                field: name.into(),
                detail: format!("non-finite value {} at flat index {i}", arr.values[i]),
            });
        }
    }
    Ok(WindowSet::from_pairs(x.values, y.values, n, t_in, t_out, chw))
}

/// Parses a version 1/2/3 `.npy` buffer holding a C-ordered numeric array.
fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("is not an .npy array (bad magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("has unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("has a truncated .npy header")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header.find(&format!("'{key}'")).ok_or(format!("has no '{key}' in its .npy header"))?;
        Ok(header[at + key.len() + 2..].trim_start_matches([':', ' ']))
    };
    if field("fortran_order")?.starts_with("True") {
        return Err("is stored in Fortran order; expected C order".into());
    }
    let descr = field("descr")?;
    let descr = descr.trim_start_matches('\'').split('\'').next().unwrap_or("");
    let shape_text = field("shape")?;
    let shape_text = &shape_text[1..shape_text.find(')').ok_or("has a malformed shape")?];
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("has a malformed shape `({shape_text})`")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    macro_rules! decode {
        ($t:ty, $n:expr) => {{
            if data.len() < count * $n {
                return Err(format!("is truncated: {} bytes for {count} values of {descr}", data.len()));
            }
            data.chunks_exact($n).take(count).map(|c| <$t>::from_le_bytes(c.try_into().unwrap()) as f32).collect()
        }};
    }
    let values: Vec<f32> = match descr {
        "<f4" => decode!(f32, 4),
        "<f8" => decode!(f64, 8),
        "|u1" | "<u1" => decode!(u8, 1),
        "<i2" => decode!(i16, 2),
        "<u2" => decode!(u16, 2),
        "<i4" => decode!(i32, 4),
        "<i8" => decode!(i64, 8),
        other => return Err(format!("has dtype `{other}`; expected little-endian float or integer")),
    };
    Ok(NpyArray { shape, values })
}

/// A C-ordered little-endian f32 `.npy` buffer (version 1.0) of `values` with `shape`.
pub fn npy_bytes(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let mut out = npy_header(shape);
    for v in values {
        out.extend(v.to_le_bytes());
    }
    out
}

/// The header of a little-endian f32 `.npy` file of `shape`; the values follow it row-major
/// (a writer can stream them after it).
pub fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Pad so that the data starts at a multiple of 64 bytes, as numpy writes it.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_npy_header_and_values() {
        let arr = parse_npy(&npy_bytes(&[2, 3], &[1., 2., 3., 4., 5., 6.])).unwrap();
        assert_eq!(arr.shape, vec![2, 3]);
        assert_eq!(arr.values[5], 6.0);
    }

    #[test]
    fn rejects_truncated_npy() {
        let mut b = npy_bytes(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        b.truncate(b.len() - 4);
        assert!(parse_npy(&b).unwrap_err().contains("truncated"));
    }
}
