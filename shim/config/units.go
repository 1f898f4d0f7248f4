package config

import (
	"errors"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"time"
)

// Bytes is an amount of memory in bytes. In TOML it is a Kubernetes-style quantity string
// ("512Mi", "1Gi", "1G", "1.5Gi") or a plain integer number of bytes.
type Bytes int64

// Binary and decimal multiples accepted by ParseBytes, as in Kubernetes quantities.
const (
	KiB Bytes = 1 << (10 * (iota + 1))
	MiB
	GiB
	TiB
	PiB
	EiB
)

var (
	errNotSize  = errors.New("not a size")
	errTooLarge = errors.New("too large")
)

// maxQuantityLen bounds the text ParseBytes looks at: no real size is longer, and annotations
// are untrusted input.
const maxQuantityLen = 64

// ParseBytes parses a Kubernetes-style memory quantity: a non-negative decimal number
// ("512", "1.5") with an optional suffix Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or k, M, G, T,
// P, E (powers of 1000); no suffix means bytes. Fractions round up to a whole byte. The error
// says what is wrong without repeating s.
func ParseBytes(s string) (Bytes, error) {
	if s == "" || len(s) > maxQuantityLen {
		return 0, errNotSize
	}
	num, suffix := s, ""
	if i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' }); i >= 0 {
		num, suffix = s[:i], s[i:]
	}
	mult, ok := suffixMultiple(suffix)
	if !ok {
		return 0, errNotSize
	}
	intPart, frac, hasDot := strings.Cut(num, ".")
	if intPart == "" || (hasDot && frac == "") || !digits(intPart) || !digits(frac) {
		return 0, errNotSize
	}
	// value = (intPart.frac * mult), rounded up: (intPart*10^k + frac) * mult / 10^k.
	n, _ := new(big.Int).SetString(intPart+frac, 10)
	n.Mul(n, big.NewInt(mult))
	if frac != "" {
		den := new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(frac))), nil)
		var rem big.Int
		n.QuoRem(n, den, &rem)
		if rem.Sign() != 0 {
			n.Add(n, big.NewInt(1))
		}
	}
	if !n.IsInt64() {
		return 0, errTooLarge
	}
	return Bytes(n.Int64()), nil
}

func suffixMultiple(suffix string) (int64, bool) {
	switch suffix {
	case "":
		return 1, true
	case "Ki", "Mi", "Gi", "Ti", "Pi", "Ei":
		return 1 << (10 * (1 + strings.IndexByte("KMGTPE", suffix[0]))), true
	case "k", "M", "G", "T", "P", "E":
		n := int64(1)
		for range 1 + strings.IndexByte("kMGTPE", suffix[0]) {
			n *= 1000
		}
		return n, true
	}
	return 0, false
}

func digits(s string) bool {
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// String formats b with the largest binary suffix that divides it exactly ("512Mi"), else in
// bytes ("1000").
func (b Bytes) String() string {
	for _, u := range []struct {
		n      Bytes
		suffix string
	}{{EiB, "Ei"}, {PiB, "Pi"}, {TiB, "Ti"}, {GiB, "Gi"}, {MiB, "Mi"}, {KiB, "Ki"}} {
		if b != 0 && b%u.n == 0 {
			return strconv.FormatInt(int64(b/u.n), 10) + u.suffix
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// MiB returns b in MiB, rounded up.
func (b Bytes) MiB() int64 { return int64((b + MiB - 1) / MiB) }

// MarshalText writes b as String does.
func (b Bytes) MarshalText() ([]byte, error) { return []byte(b.String()), nil }

// UnmarshalText parses a quantity with ParseBytes.
func (b *Bytes) UnmarshalText(text []byte) error {
	v, err := ParseBytes(string(text))
	if err != nil {
		return fmt.Errorf("%q is %w", text, err)
	}
	*b = v
	return nil
}

// Duration is a time.Duration written in TOML as a Go duration string ("60s", "1m30s").
// A struct, not a named int64, so that a bare TOML integer is a type error instead of
// nanoseconds.
type Duration struct{ time.Duration }

// String formats d like time.Duration does, without trailing zero units ("1m", not "1m0s").
func (d Duration) String() string {
	s := d.Duration.String()
	if d.Duration != 0 && d.Duration%time.Minute == 0 {
		s = strings.TrimSuffix(s, "0s")
		if d.Duration%time.Hour == 0 {
			s = strings.TrimSuffix(s, "0m")
		}
	}
	return s
}

// MarshalText writes d as String does.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(text []byte) error {
	v, err := time.ParseDuration(string(text))
	if err != nil {
		return fmt.Errorf("%q is not a duration", text)
	}
	d.Duration = v
	return nil
}
