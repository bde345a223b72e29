package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"unicode/utf8"
)

// strictJSON is what a strict parser (the reviewers used one from C) checks:
// valid UTF-8, no lone surrogate escapes, no duplicate keys, numbers a double
// can hold.
func strictJSON(b []byte) error {
	if !utf8.Valid(b) {
		return errors.New("invalid UTF-8")
	}
	if hasLoneSurrogate(b) {
		return errors.New("a lone surrogate escape")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := strictValue(dec); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the value")
	}
	return nil
}

// hasLoneSurrogate reports a \uD800-\uDFFF escape that is not a high
// surrogate followed by a low one: a strict parser rejects it, Go turns it
// into U+FFFD.
func hasLoneSurrogate(b []byte) bool {
	hex4 := func(i int) (int, bool) {
		if i+6 > len(b) || b[i] != '\\' || b[i+1] != 'u' {
			return 0, false
		}
		v, err := strconv.ParseUint(string(b[i+2:i+6]), 16, 16)
		return int(v), err == nil
	}
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		if i+1 < len(b) && b[i+1] != 'u' {
			i++ // an escape of one character, \\ included
			continue
		}
		v, ok := hex4(i)
		if !ok {
			continue
		}
		switch {
		case v >= 0xD800 && v < 0xDC00:
			if w, ok := hex4(i + 6); !ok || w < 0xDC00 || w > 0xDFFF {
				return true
			}
			i += 11
		case v >= 0xDC00 && v <= 0xDFFF:
			return true
		default:
			i += 5
		}
	}
	return false
}

func strictValue(dec *json.Decoder) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	switch v := tok.(type) {
	case json.Delim:
		switch v {
		case '{':
			seen := map[string]bool{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return err
				}
				key := k.(string)
				if seen[key] {
					return fmt.Errorf("duplicate key %q", key)
				}
				seen[key] = true
				if err := strictValue(dec); err != nil {
					return err
				}
			}
		case '[':
			for dec.More() {
				if err := strictValue(dec); err != nil {
					return err
				}
			}
		}
		_, err := dec.Token() // the closing delimiter
		return err
	case json.Number:
		if _, err := v.Float64(); err != nil {
			return fmt.Errorf("number %s: %v", v, err)
		}
	}
	return nil
}
