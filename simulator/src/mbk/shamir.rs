//! Shamir's secret sharing over GF(2^8) (the AES field, x^8 + x^4 + x^3 + x + 1), byte by byte: a secret
//! split into n shares of which any m rebuild it, and fewer tell nothing about it.
//!
//! Share i is the value at x = i (1..=n) of a random polynomial of degree m-1 whose constant term is the secret
//! byte; the secret is rebuilt by Lagrange interpolation at x = 0. Arithmetic has no secret-dependent branches
//! or table look-ups.

use rand::RngCore;
use zeroize::Zeroizing;

/// Multiplication in GF(2^8).
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    for _ in 0..8 {
        product ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (carry & 0x1b);
        b >>= 1;
    }
    product
}

/// The inverse in GF(2^8): a^254 (0 for 0, which never occurs: share indexes are distinct and non-zero).
fn inv(a: u8) -> u8 {
    let mut result = 1u8;
    let mut base = a;
    let mut e = 254u8;
    while e > 0 {
        if e & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    result
}

/// Splits `secret` into `n` shares, any `m` of which rebuild it (1 <= m <= n <= 255): (index, share bytes).
pub fn split(secret: &[u8], m: u8, n: u8) -> Vec<(u8, Zeroizing<Vec<u8>>)> {
    assert!(m >= 1 && m <= n, "1 <= m <= n");
    let mut shares: Vec<(u8, Zeroizing<Vec<u8>>)> =
        (1..=n).map(|x| (x, Zeroizing::new(Vec::with_capacity(secret.len())))).collect();
    let mut coefficients = Zeroizing::new(vec![0u8; m as usize]);
    for byte in secret {
        coefficients[0] = *byte;
        rand::rngs::OsRng.fill_bytes(&mut coefficients[1..]);
        for (x, share) in shares.iter_mut() {
            // Horner's rule from the highest coefficient.
            let y = coefficients.iter().rev().fold(0u8, |acc, c| mul(acc, *x) ^ c);
            share.push(y);
        }
    }
    shares
}

/// Rebuilds the secret from shares (index, bytes) of equal length with distinct non-zero indexes. With fewer
/// shares than the split's threshold the result is some other value: the caller checks it (a fingerprint).
pub fn combine(shares: &[(u8, &[u8])]) -> Zeroizing<Vec<u8>> {
    let len = shares.first().map_or(0, |s| s.1.len());
    // Lagrange basis at x = 0: l_j = prod_{k != j} x_k / (x_k - x_j); subtraction is XOR.
    let basis: Vec<u8> = shares
        .iter()
        .map(|(xj, _)| {
            shares.iter().filter(|(xk, _)| xk != xj).fold(1u8, |acc, (xk, _)| mul(acc, mul(*xk, inv(xk ^ xj))))
        })
        .collect();
    let mut secret = Zeroizing::new(vec![0u8; len]);
    for (i, out) in secret.iter_mut().enumerate() {
        *out = shares.iter().zip(&basis).fold(0u8, |acc, ((_, y), l)| acc ^ mul(y[i], *l));
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_arithmetic() {
        // FIPS 197 §4.2: {57} • {83} = {c1}; {57} • {13} = {fe}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "{a}");
        }
    }

    #[test]
    fn any_m_of_n_rebuild_fewer_do_not() {
        let secret: Vec<u8> = (0..32).collect();
        let shares = split(&secret, 3, 5);
        assert_eq!(shares.len(), 5);
        let pick =
            |ix: &[usize]| -> Vec<(u8, &[u8])> { ix.iter().map(|i| (shares[*i].0, &shares[*i].1[..])).collect() };
        for ix in [[0, 1, 2], [0, 2, 4], [4, 3, 1], [1, 2, 3]] {
            assert_eq!(&combine(&pick(&ix))[..], &secret[..], "{ix:?}");
        }
        assert_eq!(&combine(&pick(&[0, 1, 2, 3, 4]))[..], &secret[..]);
        assert_ne!(&combine(&pick(&[0, 1]))[..], &secret[..]);
        // Each share alone looks nothing like the secret.
        assert!(shares.iter().all(|(_, s)| s[..] != secret[..]));
    }

    #[test]
    fn one_of_one_and_two_of_two() {
        let secret = [0xa5u8; 32];
        let one = split(&secret, 1, 1);
        assert_eq!(&combine(&[(one[0].0, &one[0].1[..])])[..], &secret[..]);
        let two = split(&secret, 2, 2);
        assert_eq!(&combine(&[(two[1].0, &two[1].1[..]), (two[0].0, &two[0].1[..])])[..], &secret[..]);
        let max = split(&secret, 2, 255);
        assert_eq!(&combine(&[(max[254].0, &max[254].1[..]), (max[7].0, &max[7].1[..])])[..], &secret[..]);
    }
}
